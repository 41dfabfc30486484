"""The toy world of issue 6 (docs/toyworld.md): a synthetic text-to-image world that the project builds itself, so
that the method is proven, and a demo model shipped, without downloading any real SD3.5 weights.

* :mod:`.world`: seeded captioned 16x16 scenes with attribute labels, the caption grammar, evaluation prompts;
* :mod:`.tokenizer`: the word-level tokenizer, saved where ``flash_core.text.load_tokenizers`` finds it;
* :mod:`.encoders`: tiny CLIP-L-, CLIP-G- and T5-shaped text encoders (random, frozen) and the one-level SD3 VAE
  (16x16x16 latents: 64 image tokens at patch 2) with its training loop;
* :mod:`.evaluator`: the attribute classifier (never a training loss), Frechet distance, paired MSE, attribute
  accuracy and the real-vs-real floor;
* :mod:`.dataset`: the world as the teacher stage's ``toyworld`` dataset, which the entry points plug in;
* :mod:`.build` and :mod:`.quality`: the one-command rebuild and the quality table.
"""
