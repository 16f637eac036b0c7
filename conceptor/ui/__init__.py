"""``conceptor ui``: the web page (Gradio). ``server.serve`` starts it; the tabs live in app.py, what their
buttons do in page.py, the training queue in jobs.py, the folder rules in folders.py."""
