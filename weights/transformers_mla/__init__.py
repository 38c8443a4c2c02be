"""The PyTorch MLA model that `weights.export` ships inside MLA checkpoints (see modeling_gpt_oss_mla)."""
