"""mlflowctl's built-in plugins, installed as the package ``mlflowctl_plugins``.

Each module is a plugin written exactly as a third-party one would be: it
imports only ``mlflowctl``'s public contract and declares ``@hookimpl``
functions. Heavy SDKs (docker, kubernetes, boto3) are imported lazily,
inside the methods that need them.
"""
