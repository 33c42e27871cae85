package flb

import "testing"

// TestHasConfigMapRoom pins when the config map is declared: only in a definition block
// with room for the pointer at offset 40, which Fluent Bit 5.1.1+ (48 bytes) provides and
// the 32- and 40-byte definitions of older versions (as glibc rounds them) do not.
func TestHasConfigMapRoom(t *testing.T) {
	cases := map[uintptr]bool{32: false, 40: false, 47: false, 48: true, 56: true}
	for usable, want := range cases {
		if got := HasConfigMapRoom(usable); want != got {
			t.Errorf("HasConfigMapRoom(%d) = %v, want %v", usable, got, want)
		}
	}
}
