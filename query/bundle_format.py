"""The sealed bundle's layout: one file an auditor verifies offline.

A bundle is a zip archive:

    manifest.dsse.json        DSSE envelope (exporter's Ed25519 key) of an in-toto Statement v1:
                              subject = every other file with its SHA-256,
                              predicate = the chain-of-custody record (PREDICATE_TYPE)
    events.parquet            the selected events: segment columns, exact signed bytes, salts,
                              plus per event its inclusion proof and the tree size it proves against
    seals/p<P>/<N>.json       the ledger seals that cover the events, and each partition's newest
                              seal, whose checkpoint every inclusion proof is checked against
    consistency.json          RFC 9162 consistency proofs from each covering seal's tree to the newest
    session_states.json       per session: its state (last seq, last event hash, ended) with its proof against the
                              session-state map of its partition's newest seal (ledger/sessionmap.py)
    cosignatures/p<P>/<N>.sig witness cosignature lines (C2SP cosignature/v1) on seal N's checkpoint, N the newest
    keys/keyring.toml         the public keys involved (information only: the auditor verifies
                              against keys they trust, `--trust`)
    custody/transfer-NNNN.dsse.json   chain-of-custody transfers, appended later, each signed

A bundle holds whole sessions: whatever the scope matched, every event of a
matched session is included, so completeness can be proven (seq 0..n, an
unbroken prev_hash chain, SessionStart through SessionEnd).

These names are their own module so that the verifier (query/bundle_verify.py)
and its worker processes import the layout without the exporter's DuckDB and
Kafka modules (~0.3 s of CPU a worker).
"""

PREDICATE_TYPE = "https://custody.dev/chain-of-custody/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
TRANSFER_TYPE = "application/vnd.custody.transfer+json"
MANIFEST = "manifest.dsse.json"
EVENTS = "events.parquet"
CONSISTENCY = "consistency.json"
SESSION_STATES = "session_states.json"
KEYRING = "keys/keyring.toml"
TRANSFER_PREFIX = "custody/transfer-"
COSIGNATURES_PREFIX = "cosignatures/"
