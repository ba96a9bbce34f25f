"""The processes of one server: the supervisor, its contract with the workers, the control
channel between workers and the cluster view that answers for all of them.

None of it sits on the request path except the cluster view's whole-server answers.
"""
