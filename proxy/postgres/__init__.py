"""The PostgreSQL front end on the proxy core: its state machine (`frontend`),
its message records (`recording`), statements under policy (`policy_layer`,
`result_masking`), the proxy's own login to the target (`upstream_auth`) and
cancel keys (`cancel`).

The sans-I/O codec it speaks through lives in `ingest.protocols.postgres`,
where query's replay imports it too; sessions, sockets and recording are the
core's (`proxy.core`).
"""
