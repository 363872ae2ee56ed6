package bundle

// Test hooks for the black-box tests in package bundle_test.

var KnownImages = knownImages

func (b *Bundle) ChartDir(c Component) string { return b.charts[c] }

func (b *Bundle) ImagesOf(c Component) map[string]any { return b.images(c) }
