"""`cura ui`: a local web page over cura's own functions (see `cura.ui.server`).

workspace.py  the one folder the page may touch (paths resolved, anything outside refused)
actions.py    each screen's answer from the functions the CLI uses, with the equivalent `cura` command
jobs.py       train / eval / merge / export as real `cura` processes in their own process groups
chat.py       streaming answers of the fine-tuned and the base model
server.py     FastAPI routes, the access token, Server-Sent Events; static/index.html is the page
"""
