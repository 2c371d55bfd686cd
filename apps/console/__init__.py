"""The officers' and engineers' web console: server-rendered pages over the registry, federation and governance apps."""
