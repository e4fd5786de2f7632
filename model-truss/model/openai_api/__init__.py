"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions` (routes.py) and `/v1/models` (models.py).

requests.py validates bodies and lists what is accepted and refused; messages.py renders chats; tools.py offers
tools and parses calls; logprobs.py and responses.py build OpenAI's objects and server-sent events.
"""
