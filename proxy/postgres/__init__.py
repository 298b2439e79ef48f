"""The PostgreSQL front end: session state machine (`session`), asyncio relay
(`server`), recording (`recording`), policy (`policy_layer`, `result_masking`),
upstream login and cancels.

The sans-I/O codec it speaks through lives in `ingest.protocols.postgres`,
where query's replay imports it too.
"""
