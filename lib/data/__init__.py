"""01 prepare data: any data set into conversations, split, tokenized and audited, into the run directory.

Run by notebook 01_prepare_data and `python -m lib prepare`. It reads a file, a folder or a Hub data set
(`readers`), recognises its shape (`formats`, `turns`, `fields`: every field accounted for), normalises and
splits it (`examples`), renders it with the model's chat template (`tokenizer`, `templates`) into token ids
with the answers placed by position (`tokenization`, `reasoning`, `prompts`, `toolcalls`), audits it (`audit`) and
installs `data/` and `config.yaml` as one set (`prepare`). `textmetrics` scores answers against these
references, for the stages after it.

Public steps:

    from lib.data import run_prepare, preview                 # the stage; one example as the model sees it
    from lib.data import audit_table, fields_table, token_length_figure   # the audit as tables and a figure
    from lib.data import sources_table                        # a mix of sources: each one's share and tokens
    from lib.data import stop_token_ids                       # the tokens that end an answer
"""

from lib.data.audit import audit_table, fields_table, token_length_figure
from lib.data.prepare import preview, run_prepare
from lib.data.sources import sources_table
from lib.data.templates import stop_token_ids

__all__ = ["audit_table", "fields_table", "preview", "run_prepare", "sources_table", "stop_token_ids",
           "token_length_figure"]
