"""Requests the API must refuse with a 4xx in OpenAI's error shape, and what the message says:
one table for the in-process tier (test_api_unit.py) and the cluster tier (test_api.py)."""

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "word " * 6000}]
# (what, endpoint, body, status, a fragment of the message)
BAD = [
    ("malformed JSON", "chat", b'{"messages": [', 400, "not valid JSON"),
    ("not an object", "chat", b"[1, 2]", 400, "must be a JSON object"),
    ("no body", "chat", b"", 400, "no body"),
    ("max_tokens a string", "chat", {"messages": QUESTION, "max_tokens": "8"}, 400, "max_tokens"),
    ("messages a string", "chat", {"messages": "hello"}, 400, "messages"),
    ("temperature a word", "chat", {"messages": QUESTION, "temperature": "hot"}, 400, "temperat"),
    ("content a number", "chat", {"messages": [{"role": "user", "content": 7}]}, 400, "content"),
    ("negative max_tokens", "chat", {"messages": QUESTION, "max_tokens": -1}, 400, "max_tokens"),
    ("unknown model", "chat", {"model": "gpt-4o", "messages": QUESTION}, 404, "'gpt-4o'"),
    ("prompt past the context", "chat", {"messages": LONG}, 400, "context is 4096 tokens"),
    ("ids past the vocabulary", "complete", {"prompt": [5, 10**6]}, 400, "outside the vocab"),
    ("no prompt tokens", "complete", {"prompt": []}, 400, "no tokens"),
    ("no messages", "chat", {"messages": []}, 400, "messages"),
    ("unknown role", "chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("n above 1", "chat", {"messages": QUESTION, "n": 2}, 400, "n:"),
    ("too many stops", "complete", {"prompt": [5], "stop": ["x"] * 17}, 400, "at most 16"),
    ("a lone surrogate", "complete", b'{"prompt": "a\\ud800"}', 400, "lone surrogate"),
]
