"""Gateway: the client-facing API. Runs everything of the model but the expert FFNs,
which it dispatches to the expert servers."""
