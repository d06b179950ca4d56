"""Tokenizers of the data path: ``byte`` (``ByteTokenizer``, and ``load_tokenizer``, which turns a
``--tokenizer`` argument into a tokenizer) and ``hf`` (a local Hugging Face ``tokenizer.json``; the
``tokenizers`` library is imported only when one is loaded).
"""
