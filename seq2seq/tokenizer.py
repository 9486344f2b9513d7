"""Tokenizers: SentencePiece (BPE or unigram) and a character vocabulary, with fixed special ids."""

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
