"""Hugging Face export of a trained ACMoE model (issue #18 item 5; needs the ``hf`` extra).

* ``convert``: megatron GPTModel + fixed AC tables -> a directory that
  ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads (``convert.export``);
* ``configuration_acmoe``, ``modeling_acmoe``, ``tokenization_acmoe``: the remote code copied into
  that directory; they import only torch and transformers.

Nothing here is imported by training: ``import acmoe_megatron.inference.hf.convert`` when exporting.
"""
