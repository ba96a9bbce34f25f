"""The model repository contract shared by training (writer) and server (reader).

Kept free of torch and of server code so that both sides can import it.
"""
