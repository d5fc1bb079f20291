"""The files of the Hub model repository: the pipeline, its two components and the converter.

They live at the repository's root, which is a model repository for the Hub; the modules here are links to
them, so an editable install runs the root files themselves and a wheel carries copies of them.
"""
