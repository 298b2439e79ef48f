"""A terminal screen rebuilt from a recorded session's output: what the user saw, as text, at each moment.

The HTML replay shows the terminal as it looked, not the raw bytes with
their escape sequences, so the output is played through a small emulator of
the xterm/VT100 subset that shells and common full-screen programs use:
printable text with line wrap, CR/LF/BS/TAB, cursor movement and
positioning, erase in line and display, insert/delete of lines and
characters, scroll regions, index/reverse index, saved cursors and the
alternate screen. Colours and other attributes (SGR), OSC titles, charset
selection and modes it does not know are read and ignored, so that they can
never show up as text. Wide (East Asian) characters take one cell here: the
replay may misplace what follows them on a line, nothing else.

Sans-I/O: bytes in (split anywhere, UTF-8 or not), the rows as text out.
"""

from __future__ import annotations

import codecs

_ALTERNATE = ("1049", "1047", "47")
MAX_PARAMS = 32


class Screen:
    def __init__(self, columns: int = 80, rows: int = 24) -> None:
        self.columns, self.rows = max(1, columns), max(1, rows)
        self.cells = [[" "] * self.columns for _ in range(self.rows)]
        self.row = self.col = 0
        self.top, self.bottom = 0, self.rows - 1
        self._saved = (0, 0)
        self._main: list[list[str]] | None = None  # the main screen while the alternate one shows
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._state = "ground"
        self._seq = ""

    # --- what it shows ----------------------------------------------------------------------

    def text(self) -> str:
        """The screen's rows, trailing blanks cut (and trailing empty rows kept: the screen has its height)."""
        return "\n".join("".join(row).rstrip() for row in self.cells)

    def resize(self, columns: int, rows: int) -> None:
        columns, rows = max(1, columns), max(1, rows)
        cells = [(row + [" "] * columns)[:columns] for row in self.cells]
        if rows < len(cells):  # rows go from the top only as far as the cursor's row must stay on screen
            shift = max(0, self.row - (rows - 1))
            cells = cells[shift:shift + rows]
            self.row -= shift
        cells += [[" "] * columns for _ in range(rows - len(cells))]
        self.cells, self.columns, self.rows = cells, columns, rows
        self.top, self.bottom = 0, rows - 1
        self.row, self.col = min(self.row, rows - 1), min(self.col, columns - 1)

    # --- input --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        for ch in self._decoder.decode(data):
            self._char(ch)

    def _char(self, ch: str) -> None:
        state = self._state
        if state == "ground":
            if ch == "\x1b":
                self._state, self._seq = "escape", ""
            elif ch >= " " and ch != "\x7f":
                self._put(ch)
            else:
                self._control(ch)
        elif state == "escape":
            self._escape(ch)
        elif state == "csi":
            if "\x40" <= ch <= "\x7e":
                self._state = "ground"
                if len(self._seq) <= 64:  # a longer one was read to its end, as a terminal does, and is dropped
                    self._csi(self._seq, ch)
            elif ch == "\x1b":
                self._state, self._seq = "escape", ""
            elif len(self._seq) <= 64:
                self._seq += ch
        elif state == "osc":
            if ch == "\x07":
                self._state = "ground"
            elif ch == "\x1b":
                self._state = "osc_escape"
        elif state == "osc_escape":
            self._state = "ground" if ch == "\\" else "osc"
        elif state == "charset":
            self._state = "ground"

    def _control(self, ch: str) -> None:
        if ch == "\r":
            self.col = 0
        elif ch in "\n\x0b\x0c":
            self._linefeed()
        elif ch == "\b":
            self.col = max(0, min(self.col, self.columns - 1) - 1)
        elif ch == "\t":
            self.col = min(self.columns - 1, (self.col // 8 + 1) * 8)

    def _escape(self, ch: str) -> None:
        self._state = "ground"
        if ch == "[":
            self._state, self._seq = "csi", ""
        elif ch == "]":
            self._state = "osc"
        elif ch in "()*+":
            self._state = "charset"
        elif ch == "7":
            self._saved = (self.row, self.col)
        elif ch == "8":
            self.row, self.col = self._saved
        elif ch == "D":
            self._linefeed()
        elif ch == "E":
            self.col = 0
            self._linefeed()
        elif ch == "M":
            if self.row == self.top:
                self._scroll_down(1)
            else:
                self.row = max(0, self.row - 1)
        elif ch == "c":
            self.__init__(self.columns, self.rows)  # full reset

    def _put(self, ch: str) -> None:
        if self.col >= self.columns:  # the pending wrap of a full line
            self.col = 0
            self._linefeed()
        self.cells[self.row][self.col] = ch
        self.col += 1

    def _linefeed(self) -> None:
        if self.row == self.bottom:
            self._scroll_up(1)
        elif self.row < self.rows - 1:
            self.row += 1

    def _blank(self) -> list[str]:
        return [" "] * self.columns

    def _scroll_up(self, n: int) -> None:
        region = self.cells[self.top:self.bottom + 1]
        n = min(n, len(region))
        self.cells[self.top:self.bottom + 1] = region[n:] + [self._blank() for _ in range(n)]

    def _scroll_down(self, n: int) -> None:
        region = self.cells[self.top:self.bottom + 1]
        n = min(n, len(region))
        self.cells[self.top:self.bottom + 1] = [self._blank() for _ in range(n)] + region[:len(region) - n]

    def _csi(self, seq: str, final: str) -> None:
        private = seq[:1] in ("?", ">", "=", "<")
        body = seq[1:] if private else seq
        try:
            params = [int(p) if p else 0 for p in body.split(";")[:MAX_PARAMS]] if body else []
        except ValueError:
            return  # intermediates or sub-parameters this emulator does not read
        if private:
            if seq[:1] == "?" and final in "hl" and any(str(p) in _ALTERNATE for p in params):
                self._alternate(final == "h")
            return
        n = max(1, params[0]) if params else 1
        row, col = self.row, min(self.col, self.columns - 1)
        if final == "A":
            self.row = max(self.top if row >= self.top else 0, row - n)
        elif final in "Be":
            self.row = min(self.bottom if row <= self.bottom else self.rows - 1, row + n)
        elif final in "Ca":
            self.col = min(self.columns - 1, col + n)
        elif final == "D":
            self.col = max(0, col - n)
        elif final == "E":
            self.row, self.col = min(self.rows - 1, row + n), 0
        elif final == "F":
            self.row, self.col = max(0, row - n), 0
        elif final in "G`":
            self.col = min(self.columns - 1, n - 1)
        elif final == "d":
            self.row = min(self.rows - 1, n - 1)
        elif final in "Hf":
            r = params[0] if params else 1
            c = params[1] if len(params) > 1 else 1
            self.row, self.col = min(self.rows - 1, max(1, r) - 1), min(self.columns - 1, max(1, c) - 1)
        elif final == "J":
            self._erase_display(params[0] if params else 0)
        elif final == "K":
            self._erase_line(params[0] if params else 0)
        elif final in "LM" and self.top <= row <= self.bottom:
            region = self.cells[row:self.bottom + 1]
            n = min(n, len(region))
            if final == "L":
                region = [self._blank() for _ in range(n)] + region[:len(region) - n]
            else:
                region = region[n:] + [self._blank() for _ in range(n)]
            self.cells[row:self.bottom + 1] = region
            self.col = 0
        elif final == "P":
            line = self.cells[row]
            self.cells[row] = line[:col] + line[col + n:] + [" "] * min(n, self.columns - col)
        elif final == "@":
            line = self.cells[row]
            self.cells[row] = (line[:col] + [" "] * n + line[col:])[:self.columns]
        elif final == "X":
            line = self.cells[row]
            line[col:col + n] = [" "] * len(line[col:col + n])
        elif final == "S":
            self._scroll_up(n)
        elif final == "T":
            self._scroll_down(n)
        elif final == "r":
            top = (params[0] if params else 1) or 1
            bottom = (params[1] if len(params) > 1 else self.rows) or self.rows
            if 1 <= top < bottom <= self.rows:
                self.top, self.bottom = top - 1, bottom - 1
                self.row = self.col = 0
        elif final == "s":
            self._saved = (self.row, self.col)
        elif final == "u":
            self.row, self.col = self._saved
        # m (colours), h/l (modes), n (reports), t (window ops)…: nothing to show

    def _erase_display(self, how: int) -> None:
        if how == 0:
            self._erase_line(0)
            for r in range(self.row + 1, self.rows):
                self.cells[r] = self._blank()
        elif how == 1:
            self._erase_line(1)
            for r in range(self.row):
                self.cells[r] = self._blank()
        elif how in (2, 3):
            self.cells = [self._blank() for _ in range(self.rows)]

    def _erase_line(self, how: int) -> None:
        line, col = self.cells[self.row], min(self.col, self.columns)
        if how == 0:
            line[col:] = [" "] * (self.columns - col)
        elif how == 1:
            line[:col + 1] = [" "] * min(col + 1, self.columns)
        elif how == 2:
            self.cells[self.row] = self._blank()

    def _alternate(self, on: bool) -> None:
        if on and self._main is None:
            self._main, self._saved = self.cells, (self.row, self.col)
            self.cells = [self._blank() for _ in range(self.rows)]
        elif not on and self._main is not None:
            main, self._main = self._main, None  # resized meanwhile: fitted to the screen as it is now
            self.cells = [(row + [" "] * self.columns)[:self.columns] for row in main][-self.rows:]
            self.cells += [self._blank() for _ in range(self.rows - len(self.cells))]
            self.row, self.col = min(self._saved[0], self.rows - 1), min(self._saved[1], self.columns - 1)
