"""The HTTP server of server.py: ``serving.app.create_app`` over a ``serving.service.Service``,
its wire protocols in serving/protocols/."""
