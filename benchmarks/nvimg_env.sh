# Sourced on the lent GPU machine after gpu_env.sh: unpacks the carried .cache/nvimg.tar.gz (benchmarks/gpu_carry.sh)
# into the image's own `nvidia` package folder, so `from nvidia import nvimgcodec` resolves whether or not that
# folder is a regular package, and puts libnvjpeg where nvImageCodec's extension looks for it.
nv_dir=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || echo /tmp/deps/nvidia)
mkdir -p "$nv_dir" && tar -xzf .cache/nvimg.tar.gz -C "$(dirname "$nv_dir")"
export LD_LIBRARY_PATH=$nv_dir/cu13/lib:${LD_LIBRARY_PATH:-}
python3 -c 'from nvidia import nvimgcodec; print("nvimgcodec", nvimgcodec.__version__)'
