"""A local server on the generation code of sample.py: a page for people (server/page/) and the
AUTOMATIC1111 API that existing clients speak (server/a1111.py), over one worker that draws one
request at a time (server/worker.py). Started by `python -m commands.serve`."""
