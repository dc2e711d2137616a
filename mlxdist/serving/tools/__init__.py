"""Tool calls in the model's own words: each family's call format (formats.py, deepseek.py),
the streaming splitter that turns output into content and calls (splitter.py) and the grammar
that forces a call (grammar.py). serving/tool_calls.py is the front door."""
