"""The pure event layer: a signed delivery's bytes to plain rows.

signature (HMAC over the raw bytes) -> envelope (a delivery's identity, from
wherever it comes) -> parse (bytes to a JSON object) -> delivery (envelope and body,
parsed once) -> mappers (payload to rows, through readers) ->
rows; rules (the status derivations) and enums (every status and outcome name).

No Flask, no SQL, no network, no clock: it imports nothing of flowlens_ingest
outside this package, and is where most tests live.
"""
