"""gRPC servicers: the KServe v2 protocol, the native Classifier API, health and reflection.

They convert messages (server.api.codecs) and call the core; server.api.status maps its errors.
"""
