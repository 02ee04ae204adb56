"""
The host's credential logic. Faces (HTTP, wire) depend on this package; it
never imports a face.
"""
