"""MySQL/MariaDB client/server protocol, sans I/O: framing with sequence ids and 16 MiB continuation
(`packets`), packet bodies — handshake v10, HandshakeResponse41, auth switch, OK/ERR/EOF, column
definitions, text and binary rows, prepared statements (`messages`) —, the command phase that tells
what each server packet is (`conversation`), the authentication plugins the proxy logs in with
(`auth`), and how recorded packets read in a replay (`render`, loaded by `ingest.protocols.renderer`).
"""

from .packets import COMMUNICATION_ERROR, Packet, PacketReader, ProtocolViolation, packet, violation

__all__ = ["COMMUNICATION_ERROR", "Packet", "PacketReader", "ProtocolViolation", "packet", "violation"]
