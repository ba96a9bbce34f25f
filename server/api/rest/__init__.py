"""The KServe v2 protocol over HTTP/REST, beside gRPC in every serving process (Triton's
paths, JSON and binary tensor data): `app` (the aiohttp application, its middleware and
port), `handlers` (the endpoints), `codec` (inference bodies <-> protocol messages),
`messages` (protocol messages as JSON)."""
