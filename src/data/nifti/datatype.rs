//! The voxel types of NIfTI-1 that kpipe reads, and a macro to run typed code on them.

/// Runs the macro `$go` with the Rust type of a [`Datatype`].
macro_rules! by_datatype {
    ($dt:expr, $go:ident) => {
        match $dt {
            $crate::data::nifti::Datatype::U8 => $go!(u8),
            $crate::data::nifti::Datatype::I8 => $go!(i8),
            $crate::data::nifti::Datatype::I16 => $go!(i16),
            $crate::data::nifti::Datatype::U16 => $go!(u16),
            $crate::data::nifti::Datatype::I32 => $go!(i32),
            $crate::data::nifti::Datatype::U32 => $go!(u32),
            $crate::data::nifti::Datatype::I64 => $go!(i64),
            $crate::data::nifti::Datatype::U64 => $go!(u64),
            $crate::data::nifti::Datatype::F32 => $go!(f32),
            $crate::data::nifti::Datatype::F64 => $go!(f64),
        }
    };
}
pub(crate) use by_datatype;

/// Voxel types of NIfTI-1 that kpipe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Datatype {
    pub fn from_code(code: i16) -> Option<Datatype> {
        Some(match code {
            2 => Datatype::U8,
            4 => Datatype::I16,
            8 => Datatype::I32,
            16 => Datatype::F32,
            64 => Datatype::F64,
            256 => Datatype::I8,
            512 => Datatype::U16,
            768 => Datatype::U32,
            1024 => Datatype::I64,
            1280 => Datatype::U64,
            _ => return None,
        })
    }

    pub fn code(self) -> i16 {
        match self {
            Datatype::U8 => 2,
            Datatype::I16 => 4,
            Datatype::I32 => 8,
            Datatype::F32 => 16,
            Datatype::F64 => 64,
            Datatype::I8 => 256,
            Datatype::U16 => 512,
            Datatype::U32 => 768,
            Datatype::I64 => 1024,
            Datatype::U64 => 1280,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Datatype::U8 | Datatype::I8 => 1,
            Datatype::I16 | Datatype::U16 => 2,
            Datatype::I32 | Datatype::U32 | Datatype::F32 => 4,
            Datatype::I64 | Datatype::U64 | Datatype::F64 => 8,
        }
    }

    /// numpy's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Datatype::U8 => "uint8",
            Datatype::I8 => "int8",
            Datatype::I16 => "int16",
            Datatype::U16 => "uint16",
            Datatype::I32 => "int32",
            Datatype::U32 => "uint32",
            Datatype::I64 => "int64",
            Datatype::U64 => "uint64",
            Datatype::F32 => "float32",
            Datatype::F64 => "float64",
        }
    }

    pub fn is_integer(self) -> bool {
        !matches!(self, Datatype::F32 | Datatype::F64)
    }
}
