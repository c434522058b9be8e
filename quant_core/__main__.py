import sys

from .allocator import prefer_huge_pages

prefer_huge_pages()  # before the CLI's modules import torch, which reads it once (quant_core.allocator)

from .cli import main  # noqa: E402

sys.exit(main())
