package bundle

import (
	"cmp"
	"errors"
	"fmt"
	"regexp"
	"strconv"
)

// semver is a release version "MAJOR.MINOR.PATCH", or a minor "MAJOR.MINOR"
// when hasPatch is false. Pre-releases are not catalogued.
type semver struct {
	major, minor, patch int
	hasPatch            bool
}

var versionRE = regexp.MustCompile(`^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*))?$`)

func parseVersion(s string) (semver, error) {
	m := versionRE.FindStringSubmatch(s)
	if m == nil {
		return semver{}, errors.New(`not a version: want a release like "1.28.2" or a minor like "1.28"`)
	}
	var v semver
	v.major, _ = strconv.Atoi(m[1])
	v.minor, _ = strconv.Atoi(m[2])
	if m[3] != "" {
		v.hasPatch = true
		v.patch, _ = strconv.Atoi(m[3])
	}
	return v, nil
}

// parseRelease parses an exact "MAJOR.MINOR.PATCH".
func parseRelease(s string) (semver, error) {
	v, err := parseVersion(s)
	if err == nil && !v.hasPatch {
		err = errors.New(`not a release: want MAJOR.MINOR.PATCH, e.g. "1.28.2"`)
	}
	return v, err
}

// parseMinor parses a "MAJOR.MINOR".
func parseMinor(s string) (semver, error) {
	v, err := parseVersion(s)
	if err == nil && v.hasPatch {
		err = errors.New(`not a minor: want MAJOR.MINOR, e.g. "1.28"`)
	}
	return v, err
}

func (v semver) minorString() string { return fmt.Sprintf("%d.%d", v.major, v.minor) }

func (v semver) compareMinor(w semver) int {
	return cmp.Or(cmp.Compare(v.major, w.major), cmp.Compare(v.minor, w.minor))
}

func (v semver) compare(w semver) int {
	return cmp.Or(v.compareMinor(w), cmp.Compare(v.patch, w.patch))
}

var kernelRE = regexp.MustCompile(`^[0-9]+\.[0-9]+(\.[0-9]+)?$`)

// imageRE accepts registry/repository[:tag][@sha256:digest] with a registry
// host, e.g. docker.io/istio/pilot:1.28.2.
var imageRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$`)

var tagOrDigestRE = regexp.MustCompile(`(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[a-f0-9]{64})$`)

func validImage(ref string) error {
	if !imageRE.MatchString(ref) {
		return errors.New("not an image reference: want registry/repository:tag, e.g. docker.io/istio/pilot:1.28.2")
	}
	// The last path element must carry a tag or digest: ":" before the last
	// "/" is a registry port, not a tag.
	last := ref
	for i := len(ref) - 1; i >= 0; i-- {
		if ref[i] == '/' {
			last = ref[i:]
			break
		}
	}
	if !tagOrDigestRE.MatchString(last) {
		return errors.New("no tag or digest: pin the image, e.g. docker.io/istio/pilot:1.28.2")
	}
	return nil
}
