"""The `diffexit` command line and the Gradio demo."""
