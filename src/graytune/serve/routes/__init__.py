"""The service's HTTP routes, one router per kind of work, each over the typed ``Service``.

- ``info``: ``/v1/health``, ``/v1/spec``, ``/v1/stats`` (answered on the event loop, never waiting for the backbone);
- ``boundary``: ``/v1/tokenize``, ``/v1/forward``, ``/v1/vjp`` and releasing sessions (the backbone's calls);
- ``hosted``: ``/v1/adapters/...``, the owner's trained adapters (``install_adapters`` adds them).

Routes reach the service, the caller's name and the adapter host through the typed dependencies of
``dependencies`` (and ``hosted.HostDep``), never through closures.
"""
