"""tokenmill's inference engine: `LLM` for offline batches, `AsyncLLM` for streaming.

The public names are imported lazily so that light modules (`engine.config`,
`engine.sampling_params`) can be used without loading the whole engine.
"""

from engine.lazy_exports import lazy_getattr

_EXPORTS = {
    "LLM": "engine.llm",
    "AsyncLLM": "engine.async_llm",
    "EngineArgs": "engine.args",
    "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.structured_output",
    "GuidedDecodingParams": "engine.structured_output",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "EngineStats": "engine.outputs",
    "BeamSearchParams": "engine.beam_search",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
