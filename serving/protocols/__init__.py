"""One module per wire protocol, each with ``install(app, service, ...)`` that adds its routes to
the app as the model's card allows (serving/app.py calls them all): ``chat`` (``POST /chat``) and
``realtime`` (``WS /v1/realtime``) for every model, ``duplex`` (``WS /v1/duplex``) when the card
says duplex, ``hertz_reference`` (``WS /audio``, ``POST /set_temperature``) and ``kyutai_reference``
(``WS /api/chat``) when the card lists their protocol in ``card.protocols``. A route the card
does not allow answers with an error that says why."""
