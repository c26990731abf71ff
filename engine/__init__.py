"""The inference engine: block manager, scheduler, model runner, sampler, async front."""
