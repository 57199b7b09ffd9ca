// Package layering holds only a test: it checks the import rule of
// docs/ARCHITECTURE.md (section 1) against `go list` of the module.
package layering
