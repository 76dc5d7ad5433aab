"""06 merge and chat: the adapter merged into its base, checked, talked to, exported and published.

Run by notebook 06_merge_and_chat and `python -m lib merge`, `chat`, `export` and `push`. `merge` folds
the adapter into an unquantized base and checks it; `chat` the widget, REPL and one reply; `export` the
GGUF with its Ollama Modelfile (`llamacpp`, `ollama`) and the parity gate (`parity`); `push` the folder
for the Hub and its upload.

Public steps:

    from lib.ship import run_merge, merge_table, gate_failure
    from lib.ship import load_session, chat_widget, run_script, run_chat
    from lib.ship import ensure_llama_cpp, run_export, parity_table
    from lib.ship import run_push
"""

from lib.ship.chat import chat_widget, load_session, run_chat, run_script
from lib.ship.export import run_export
from lib.ship.llamacpp import ensure_llama_cpp
from lib.ship.merge import gate_failure, merge_table, run_merge
from lib.ship.parity import parity_table
from lib.ship.push import run_push

__all__ = ["chat_widget", "ensure_llama_cpp", "gate_failure", "load_session", "merge_table", "parity_table",
           "run_chat", "run_export", "run_merge", "run_push", "run_script"]
