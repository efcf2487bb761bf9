"""Evaluation: methods side by side on the same items (``dlmom eval``).

```python
from dlmom.evaluation import evaluate, format_table
ev = evaluate("gsm8k", "my_problems.jsonl", experts, "single,text-mas,dlmom,dlmom:latent",
              out="results.jsonl", max_new_tokens=256)
print(format_table(ev.summary))
```

formats (reading items, building prompts), scoring (answers from completions), sandbox (running code),
stats (Wilson interval, exact McNemar), methods (method names), records (the ``--out`` file), report
(summary and tables), harness (the loop), command (``dlmom eval``).
"""
from .formats import TASKS, Item, read_items
from .harness import Evaluation, evaluate
from .report import format_table, summarize
from .sandbox import Limits, run_program
from .stats import mcnemar_exact, wilson

__all__ = ["TASKS", "Item", "read_items", "Evaluation", "evaluate", "format_table", "summarize", "Limits",
           "run_program", "mcnemar_exact", "wilson"]
