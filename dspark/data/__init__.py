"""The stdlib corpus, its tokenizer and the prompt sets cut from it."""

from dspark.data.corpus import Document, build_corpus, corpus_manifest, split_of
from dspark.data.eval_sets import build_eval_sets, read_jsonl, write_jsonl
from dspark.data.tokenizer import EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, train_tokenizer

__all__ = ["Document", "EOS_TOKEN", "MASK_TOKEN", "PAD_TOKEN", "build_corpus", "build_eval_sets", "corpus_manifest",
           "read_jsonl", "split_of", "train_tokenizer", "write_jsonl"]
