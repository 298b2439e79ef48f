"""The MySQL/MariaDB front end on the proxy core (`frontend`), its `[[proxy]]` keys (`settings`) and the
masking of result rows (`masking`); the codec is `ingest.protocols.mysql`."""
