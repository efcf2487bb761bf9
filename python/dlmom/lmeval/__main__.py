"""``python -m dlmom.lmeval ...``: lm-eval's own command line, with "dlmom" among its models
(``--model dlmom --model_args experts=org/a|org/b,top_k=8``). lm-eval finds models only in its own package or
among classes registered in its process (it reads no plugin entry points), hence this launcher."""
from dlmom.lmeval import model  # noqa: F401  registers "dlmom"
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
