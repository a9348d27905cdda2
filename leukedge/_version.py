"""The package version, at the bottom of the import layers: any module may import it without importing the
package face (``leukedge/__init__.py``) and so without an import pointing up the layers."""

__version__ = "0.1.0"
