"""Scale-out on Ray Serve (the optional ``[ray]`` extra): the same app and protocols as the
single-process server, in front of replicas of each model on many GPUs and machines.

- ``replica.py``  ModelReplica: one Serve deployment per model, each replica one Service (model
                  loaded once on its device); a reply streams out of it as tagged items.
- ``remote.py``   RemoteService: the Service port (model, options, stream, metrics) over a Serve
                  deployment handle, so serving/protocols run unchanged against remote replicas.
- ``front.py``    the ASGI front: one gate (serving/security.py) before one app per model, chosen by
                  path prefix, ``?model=`` or the ``model`` field of /chat; /health, /v1/models and
                  /metrics over every model.
- ``ingress.py``  Ingress: the Serve ingress deployment that builds the front from the handles.
- ``deploy.py``   replica counts, autoscaling and resources from the command line -> a Serve app.
- ``local.py``    a single-machine Ray on loopback only (server.py without --ray-address, tests).
- ``cli.py``      ``server.py --replicas ... [--ray-address ...]``: starts or joins Ray and runs it.

docs/SCALING.md has the how-to, the capacity model and the measured overhead.
"""
