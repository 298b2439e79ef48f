"""Tests for ledger.checkpoint: Go sumdb/note vectors, tamper cases, checkpoint syntax.

The PeterNeumann and EnochRoot keys, text and signatures are the test vectors
of golang.org/x/mod/sumdb/note (note_test.go); reproducing them byte for byte
shows our notes interoperate with the Go implementation.
"""

from __future__ import annotations

import base64
import hashlib

import nacl.signing
import pytest

from ledger.checkpoint import (
    AmbiguousKeyError,
    Checkpoint,
    CheckpointOriginError,
    InvalidSignatureError,
    MalformedCheckpointError,
    MalformedKeyError,
    MalformedNoteError,
    NoteError,
    NoteSignature,
    NoTrustedSignatureError,
    Signer,
    Verifier,
    key_id,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    sign_note,
)
from ledger.merkle import EMPTY_ROOT, leaf_hash

PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
)
SIGNED = (TEXT + "\n" + PETER_SIG).encode()

PETER = Verifier.parse(PETER_VKEY)
ENOCH = Verifier.parse(ENOCH_VKEY)


def _note(*parts: str) -> bytes:
    return "".join(parts).encode()


# Keys ----------------------------------------------------------------------------


def test_go_signer_key_round_trips() -> None:
    signer = Signer.parse(PETER_SKEY)
    assert (signer.name, signer.key_id.hex()) == ("PeterNeumann", "c74f20a3")
    assert signer.skey == PETER_SKEY
    assert signer.verifier.vkey == PETER_VKEY


def test_go_verifier_key_round_trips() -> None:
    assert (PETER.name, PETER.key_id.hex()) == ("PeterNeumann", "c74f20a3")
    assert PETER.vkey == PETER_VKEY
    assert ENOCH.vkey == ENOCH_VKEY


def test_key_id_hashes_name_newline_algorithm_and_key() -> None:
    expected = hashlib.sha256(b"PeterNeumann\n\x01" + PETER.public_key).digest()[:4]
    assert key_id("PeterNeumann", PETER.public_key) == expected == bytes.fromhex("c74f20a3")


def test_keys_from_pynacl_match_the_go_strings() -> None:
    seed = base64.b64decode(PETER_SKEY.split("+", 4)[4])[1:]
    signing_key = nacl.signing.SigningKey(seed)
    assert Signer.from_key("PeterNeumann", signing_key) == Signer.parse(PETER_SKEY)
    assert Verifier.from_key("PeterNeumann", signing_key.verify_key) == PETER


def test_signer_repr_hides_the_private_key() -> None:
    assert "AYEKF" not in repr(Signer.parse(PETER_SKEY))
    assert "signing_key" not in repr(Signer.parse(PETER_SKEY))


@pytest.mark.parametrize("key", [PETER_VKEY, PETER_SKEY], ids=["vkey", "skey"])
def test_every_mangled_key_is_rejected(key: str) -> None:
    # As in Go's TestNewVerifier/TestNewSigner: every proper substring and
    # every single-byte change must fail to parse.
    parse = Signer.parse if key.startswith("PRIVATE") else Verifier.parse
    mangled = {key[i:j] for i in range(len(key)) for j in range(i + 1, len(key) + 1)} - {key}
    mangled |= {key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :] for i in range(len(key))}
    for candidate in mangled:
        with pytest.raises(MalformedKeyError):
            parse(candidate)


@pytest.mark.parametrize(
    ("vkey", "message"),
    [
        ("PeterNeumann+c74f20a3", "is not <name>\\+<key ID>\\+<key>"),
        ("PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "key ID 'C74F20A3' is not 8 lowercase hex"),
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "key ID c74f20a4 does not match key PeterNeumann\\+c74f20a3"),
        ("PeterNeumann+c74f20a3+" + base64.b64encode(b"\x01" + b"k" * 33).decode(), "key is 34 bytes, expected 1"),
        ("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "key algorithm 0x65 is not Ed25519"),
        ("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T", "is not valid base64"),
        ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "contains forbidden character U\\+0020"),
        ("+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "key name is empty"),
    ],
)
def test_malformed_verifier_key_message(vkey: str, message: str) -> None:
    with pytest.raises(MalformedKeyError, match=message):
        Verifier.parse(vkey)


def test_signer_key_needs_private_key_prefix() -> None:
    with pytest.raises(MalformedKeyError, match="signer key is not PRIVATE\\+KEY\\+"):
        Signer.parse(PETER_VKEY)


def test_verifier_with_inconsistent_key_id_cannot_be_built() -> None:
    with pytest.raises(MalformedKeyError, match="key ID 00000000 does not match"):
        Verifier("PeterNeumann", b"\x00" * 4, PETER.verify_key)


# Signing -------------------------------------------------------------------------


def test_sign_reproduces_go_note_byte_for_byte() -> None:
    assert sign_note(TEXT, [Signer.parse(PETER_SKEY)]) == SIGNED


def test_sign_with_several_signers_adds_lines_in_order() -> None:
    other = Signer.from_key("example.com/witness", nacl.signing.SigningKey(b"\x07" * 32))
    note = sign_note(TEXT, [Signer.parse(PETER_SKEY), other])
    assert note.startswith(SIGNED)
    assert open_note(note, [PETER, other.verifier]).verified_by == (PETER, other.verifier)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "note text does not end with a newline"),
        ("a\x01b\n", "control character U\\+0001 at position 1"),
        ("a\ud800\n", "not encodable as UTF-8"),
    ],
)
def test_sign_rejects_malformed_text(text: str, message: str) -> None:
    with pytest.raises(MalformedNoteError, match=message):
        sign_note(text, [Signer.parse(PETER_SKEY)])


def test_sign_needs_a_signer() -> None:
    with pytest.raises(MalformedNoteError, match="no signers given"):
        sign_note(TEXT, [])


def test_signed_text_may_contain_blank_lines() -> None:
    text = "first\n\nsecond\n\n"
    note = sign_note(text, [Signer.parse(PETER_SKEY)])
    assert open_note(note, [PETER]).text == text


# Opening -------------------------------------------------------------------------


def test_open_go_note() -> None:
    opened = open_note(SIGNED, [PETER])
    assert (opened.text, opened.verified_by, opened.unverified) == (TEXT, (PETER,), ())


def test_open_reports_signatures_from_unknown_keys() -> None:
    opened = open_note(_note(TEXT, "\n", PETER_SIG, ENOCH_SIG), [PETER])
    assert opened.verified_by == (PETER,)
    assert [(s.name, s.key_id.hex()) for s in opened.unverified] == [("EnochRoot", "af0cfe78")]
    assert opened.unverified[0].line + "\n" == ENOCH_SIG


def test_open_verifies_every_trusted_signature() -> None:
    opened = open_note(_note(TEXT, "\n", PETER_SIG, ENOCH_SIG), [ENOCH, PETER])
    assert opened.verified_by == (PETER, ENOCH)


def test_open_drops_repeated_signatures() -> None:
    opened = open_note(_note(TEXT, "\n", PETER_SIG, PETER_SIG, ENOCH_SIG, ENOCH_SIG), [PETER])
    assert (len(opened.verified_by), len(opened.unverified)) == (1, 1)


def test_open_rejects_note_without_trusted_signature() -> None:
    with pytest.raises(
        NoTrustedSignatureError,
        match=r"^note has no signature from a trusted key \(signed by PeterNeumann\+c74f20a3, EnochRoot\+af0cfe78\)$",
    ):
        open_note(_note(TEXT, "\n", PETER_SIG, ENOCH_SIG), [])


def test_open_rejects_changed_text() -> None:
    tampered = SIGNED.replace(b"cryptography", b"cryptographY")
    with pytest.raises(InvalidSignatureError, match="^invalid signature for key PeterNeumann\\+c74f20a3$"):
        open_note(tampered, [PETER])


def test_open_rejects_changed_signature() -> None:
    sig = PETER_SIG.replace("x08go/ZJkuBS9UG", "x08go/ZJkuBS9UH")
    with pytest.raises(InvalidSignatureError, match="PeterNeumann\\+c74f20a3"):
        open_note(_note(TEXT, "\n", sig), [PETER])


def test_open_rejects_signature_of_wrong_length() -> None:
    # Go's note_test.go inserts "ABCD" into the signature: the key ID still
    # matches, the signature becomes 67 bytes.
    sig = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(InvalidSignatureError):
        open_note(_note(TEXT, "\n", sig), [PETER])


def test_invalid_trusted_signature_rejects_note_even_if_another_verifies() -> None:
    bad_enoch = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    with pytest.raises(InvalidSignatureError, match="EnochRoot\\+af0cfe78"):
        open_note(_note(TEXT, "\n", PETER_SIG, bad_enoch), [PETER, ENOCH])


def test_open_ignores_signature_from_wrong_key_with_same_name() -> None:
    impostor = Signer.from_key("PeterNeumann", nacl.signing.SigningKey(b"\x01" * 32))
    note = sign_note(TEXT, [impostor])
    with pytest.raises(NoTrustedSignatureError, match=f"PeterNeumann\\+{impostor.key_id.hex()}"):
        open_note(note, [PETER])


def test_open_ignores_known_key_id_under_another_name() -> None:
    renamed = PETER_SIG.replace("PeterNeumann", "CarmenSandiego")
    with pytest.raises(NoTrustedSignatureError, match="CarmenSandiego\\+c74f20a3"):
        open_note(_note(TEXT, "\n", renamed), [PETER])


def test_open_rejects_two_trusted_keys_with_same_name_and_id() -> None:
    # These two seeds were found by a birthday search: their key IDs under
    # this name collide (36e76f29), which a 32-bit ID cannot prevent.
    seeds = [hashlib.sha256(b"collision-seed-%d" % i).digest() for i in (14173, 41281)]
    keys = [Verifier.from_key("example.com/log", nacl.signing.SigningKey(s).verify_key) for s in seeds]
    assert keys[0].key_id == keys[1].key_id == bytes.fromhex("36e76f29")
    with pytest.raises(AmbiguousKeyError, match="two trusted keys are named example.com/log\\+36e76f29"):
        open_note(SIGNED, keys)


def test_open_accepts_the_same_trusted_key_twice() -> None:
    assert open_note(SIGNED, [PETER, Verifier.parse(PETER_VKEY)]).verified_by == (PETER,)


@pytest.mark.parametrize(
    ("note", "message"),
    [
        (_note(TEXT), "no blank line before its signatures"),
        (_note(TEXT, "\n"), "no signature lines"),
        (_note(TEXT, "\n", PETER_SIG[:-1]), "last signature line does not end with a newline"),
        (b"\x01" + SIGNED, "control character U\\+0001 at position 0"),
        (b"\xff" + SIGNED, "not valid UTF-8 \\(invalid start byte at byte 0\\)"),
        (_note(TEXT, "\n", PETER_SIG, "Unexpected line.\n"), "signature line 2 does not start with an em dash"),
        (_note(TEXT, "\n", "- PeterNeumann x08go/ZJku\n"), "signature line 1 does not start with an em dash"),
        (_note(TEXT, "\n", PETER_SIG.replace("PeterNeumann", "Bad Name")), "signature line 1 \\(Bad\\): signature"),
        (_note(TEXT, "\n", "\u2014  x08go/ZJku\n"), "signature line 1: key name is empty"),
        (_note(TEXT, "\n", "\u2014 PeterNeumann\n"), "signature line 1 \\(PeterNeumann\\): 0 bytes is too short"),
        (_note(TEXT, "\n", "\u2014 PeterNeumann x08go/ZJku=\n"), "signature '.*' is not valid base64"),
        (_note(TEXT, "\n", "\u2014 PeterNeumann x08go/Z=\n"), "signature 'x08go/Z=' is not canonical base64"),
        (_note(TEXT, "\n", "\u2014 PeterNeumann x08gow==\n"), "4 bytes is too short for a key ID and a signature"),
        (_note(TEXT, "\n", PETER_SIG * 101), "101 signature lines, more than the limit of 100"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_open_rejects_malformed_note(note: bytes, message: str) -> None:
    with pytest.raises(MalformedNoteError, match=message):
        open_note(note, [PETER])


def test_open_accepts_a_hundred_signature_lines() -> None:
    assert open_note(_note(TEXT, "\n", PETER_SIG * 100), [PETER]).verified_by == (PETER,)


def test_note_signature_line_format() -> None:
    sig = NoteSignature("PeterNeumann", bytes.fromhex("c74f20a3"), b"\x00" * 64)
    assert sig.line == "\u2014 PeterNeumann " + base64.b64encode(bytes.fromhex("c74f20a3") + b"\x00" * 64).decode()


def test_every_failure_is_a_note_error_and_a_value_error() -> None:
    for error in (MalformedNoteError, MalformedKeyError, AmbiguousKeyError, InvalidSignatureError,
                  NoTrustedSignatureError, MalformedCheckpointError, CheckpointOriginError):
        assert issubclass(error, NoteError) and issubclass(error, ValueError)


# Checkpoints ---------------------------------------------------------------------

SPEC_TEXT = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
ROOT = leaf_hash(b"root")
ROOT_B64 = base64.b64encode(ROOT).decode()


def test_parse_spec_example() -> None:
    checkpoint = Checkpoint.parse(SPEC_TEXT)
    assert (checkpoint.origin, checkpoint.size, checkpoint.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert checkpoint.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert checkpoint.to_text() == SPEC_TEXT


def test_format_with_extension_lines_round_trips() -> None:
    checkpoint = Checkpoint("custody.example/ledger/p0", 0, EMPTY_ROOT, ("ext one", "ext two"))
    text = checkpoint.to_text()
    assert text == f"custody.example/ledger/p0\n0\n{base64.b64encode(EMPTY_ROOT).decode()}\next one\next two\n"
    assert Checkpoint.parse(text) == checkpoint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"log\n1\n{ROOT_B64}", "does not end with a newline"),
        ("log\n1\n", "checkpoint has 2 lines, expected at least 3"),
        (f"\n1\n{ROOT_B64}\n", "origin '' is empty"),
        (f"log\n01\n{ROOT_B64}\n", "tree size '01' is not a decimal number without leading zeros"),
        (f"log\n\n{ROOT_B64}\n", "tree size '' is not"),
        (f"log\n-1\n{ROOT_B64}\n", "tree size '-1' is not"),
        (f"log\n+1\n{ROOT_B64}\n", "tree size '\\+1' is not"),
        (f"log\n 1\n{ROOT_B64}\n", "tree size ' 1' is not"),
        (f"log\n\u0661\n{ROOT_B64}\n", "tree size '\u0661' is not"),
        (f"log\n18446744073709551616\n{ROOT_B64}\n", "tree size 18446744073709551616 is not a 64-bit"),
        (f"log\n1\n{base64.b64encode(ROOT[:31]).decode()}\n", "root hash is 31 bytes, expected 32"),
        (f"log\n1\n{ROOT_B64[:-1]}\n", "root hash .* is not valid base64"),
        (f"log\n1\n{ROOT_B64[:-2]}B=\n", "root hash .* is not canonical base64"),
        (f"log\n1\n{ROOT_B64}\n\n", "extension line 1 '' is empty"),
        (f"log\x01\n1\n{ROOT_B64}\n", "control character U\\+0001"),
    ],
)
def test_parse_rejects_malformed_checkpoint(text: str, message: str) -> None:
    with pytest.raises(MalformedCheckpointError, match=message):
        Checkpoint.parse(text)


def test_parse_accepts_largest_tree_size() -> None:
    assert Checkpoint.parse(f"log\n18446744073709551615\n{ROOT_B64}\n").size == 2**64 - 1


def test_checkpoint_rejects_multiline_fields() -> None:
    with pytest.raises(MalformedCheckpointError, match="origin 'a\\\\nb' is empty or spans lines"):
        Checkpoint("a\nb", 1, ROOT)
    with pytest.raises(MalformedCheckpointError, match="extension line 1 'x\\\\ny' is empty or spans lines"):
        Checkpoint("log", 1, ROOT, ("x\ny",))


def test_signed_checkpoint_round_trips() -> None:
    signer = Signer.from_key("custody.example/ledger/p0", nacl.signing.SigningKey(b"\x05" * 32))
    checkpoint = Checkpoint("custody.example/ledger/p0", 8, ROOT)
    note = sign_checkpoint(checkpoint, [signer])
    assert note.startswith(checkpoint.to_text().encode() + "\n\u2014 custody.example/ledger/p0 ".encode())
    opened, verified = open_checkpoint(note, [signer.verifier], origin="custody.example/ledger/p0")
    assert opened == checkpoint
    assert verified.verified_by == (signer.verifier,)


def test_open_checkpoint_rejects_other_origin() -> None:
    signer = Signer.from_key("custody.example/ledger", nacl.signing.SigningKey(b"\x05" * 32))
    note = sign_checkpoint(Checkpoint("custody.example/ledger/p1", 8, ROOT), [signer])
    with pytest.raises(
        CheckpointOriginError,
        match="checkpoint origin 'custody.example/ledger/p1' is not the expected 'custody.example/ledger/p0'",
    ):
        open_checkpoint(note, [signer.verifier], origin="custody.example/ledger/p0")


def test_open_checkpoint_rejects_signed_non_checkpoint() -> None:
    with pytest.raises(MalformedCheckpointError, match="checkpoint has 2 lines, expected at least 3"):
        open_checkpoint(SIGNED, [PETER], origin="If you think cryptography is the answer to your problem,")
