package config

import (
	"reflect"
	"slices"
	"strings"
)

// What a reload applies while the agent runs (man tcpha.conf(5), RELOAD):
// the FE's scheduling and timings, the FEs a BE takes sessions from, and
// the log level. Every other field of the structs below is fixed until
// an upgrade; a field added later is fixed unless named here.
var (
	reloadableGlobal = []string{"LogLevel"}
	reloadableFE     = []string{"Servers", "Rules", "Scheduler", "Rise", "Fall", "DtcInterval", "HandoffTimeout", "PHTTP", "Check"}
	reloadableBE     = []string{"FEAddrs", "Check"}
)

// Unreloadable names the settings whose change from old to next a reload
// does not apply, as `[section] key`: they take effect with an upgrade.
func Unreloadable(old, next *Config) []string {
	var out []string
	if (next.FE == nil) != (old.FE == nil) || (next.BE == nil) != (old.BE == nil) {
		out = append(out, "the roles ([fe], [be] sections)")
	}
	out = append(out, fixedKeys("global", old.Global, next.Global, reloadableGlobal)...)
	if old.FE != nil && next.FE != nil {
		out = append(out, fixedKeys("fe", *old.FE, *next.FE, reloadableFE)...)
	}
	if old.BE != nil && next.BE != nil {
		out = append(out, fixedKeys("be", *old.BE, *next.BE, reloadableBE)...)
	}
	return out
}

// fixedKeys names the fields of a and b, two values of the same struct
// type, that differ and are not reloadable. Reflection, so that a field
// added to the struct is never silently taken as reloaded.
func fixedKeys(section string, a, b any, reloadable []string) []string {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	var out []string
	for i := range va.NumField() {
		name := va.Type().Field(i).Name
		if slices.Contains(reloadable, name) {
			continue
		}
		if !reflect.DeepEqual(va.Field(i).Interface(), vb.Field(i).Interface()) {
			out = append(out, "["+section+"] "+strings.ToLower(name))
		}
	}
	return out
}
