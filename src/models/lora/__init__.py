"""LoRAs: resolving a job's LoRA files (`sources`), loading and checking them (`adapters`),
the unfused branches (`branches`), switching sets (`switch`), the preset held ready (`resident`)
and fusing into FP8 weights (`fp8_fusing`)."""
