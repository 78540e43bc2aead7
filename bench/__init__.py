"""Side-by-side benchmarks with diffusers at equal architecture (``make bench``).

``python -m bench [--only unet_train,unet_infer,e2e,vae,data,gpu] [--quick] [--full]
[--write]``: see ``bench/__main__.py`` and ``bench/RESULTS.md``.
"""
