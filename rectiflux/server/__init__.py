"""`rectiflux serve`: one model behind a queue (`engine.py`), its history in SQLite (`history.py`), uploads
(`uploads.py`), job settings checked like the command line's (`settings.py`), live previews (`preview.py`), and the
web application (`app.py`) with the OpenAI (`openai_api.py`) and AUTOMATIC1111 (`a1111.py`) APIs and the page
(`static/`). Needs the `rectiflux[serve]` extra (FastAPI and uvicorn)."""
