// Package version says which tcpha a binary is: the version the build
// stamped (make: -ldflags -X tcpha/internal/version.Version=...), else the
// VCS revision Go recorded, else "devel".
package version

import "runtime/debug"

// Version is set by the build; empty in a plain go build.
var Version string

// String returns the version, with the Go version that built it.
func String() string {
	v := Number()
	if info, ok := debug.ReadBuildInfo(); ok {
		v += " (" + info.GoVersion + ")"
	}
	return v
}

// Number returns the version alone, without the Go version
// (tcpha_build_info's version label).
func Number() string {
	v := Version
	info, ok := debug.ReadBuildInfo()
	if v == "" && ok {
		rev, dirty := "", false
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if len(rev) > 12 {
			rev = rev[:12]
		}
		if rev != "" {
			v = rev
			if dirty {
				v += "-dirty"
			}
		}
	}
	if v == "" {
		v = "devel"
	}
	return v
}
