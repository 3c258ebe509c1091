"""Lightning callbacks: ``task_vector.TaskVectorCallback`` writes an expert's task vector when fitting ends.

Why a package above ``models`` and ``task_vectors``: a callback needs both the expert module it watches and the
format it writes, so it cannot live in either without an import cycle.
"""
