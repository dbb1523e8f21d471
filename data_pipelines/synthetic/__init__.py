"""Procedural multi-view scenes with exact geometry (`render`) and spatial QA with exact answers (`spatial_qa`)."""
from data_pipelines.synthetic.render import RenderConfig, RenderedScene, render_scene
from data_pipelines.synthetic.spatial_qa import QAConfig, make_spatial_qa, synthetic_qa_scene

__all__ = ["QAConfig", "RenderConfig", "RenderedScene", "make_spatial_qa", "render_scene", "synthetic_qa_scene"]
