"""Chatting with a fine-tuned model: ``stage=chat`` (serve.py) and the Hub Space (space.py),
both over the Gradio app of app.py."""
